"""The ``ferryman`` command: ``run`` a config-driven proxy, or ``check`` a config file."""

from __future__ import annotations

import argparse
import logging
import sys

from ferryman import __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ferryman", description="A fast, programmable HTTP proxy."
    )
    parser.add_argument("--version", action="version", version=f"ferryman {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the proxy described by a config file")
    run.add_argument("-c", "--config", required=True, metavar="FILE", help="YAML config file")
    run.add_argument("--workers", type=int, default=None, help="override server.workers")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument(
        "--daemon",
        action="store_true",
        help="detach once listening: log lines go to server.error_log (required), the pid "
        "to server.pid_file",
    )
    run.add_argument(
        "--upgrade",
        action="store_true",
        help="take the listening sockets over from the server running with this config's "
        "server.upgrade_sock, which then drains and exits (zero-downtime upgrade)",
    )
    check = sub.add_parser("check", help="validate a config file and exit")
    check.add_argument("-c", "--config", required=True, metavar="FILE", help="YAML config file")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ferryman`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    from ferryman.app import AppLoadError, build_proxy, build_server, check_tls_material
    from ferryman.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"ferryman: invalid config:\n{exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"ferryman: cannot read config {args.config}: {exc.strerror}", file=sys.stderr)
        return 2
    if args.command == "check":
        try:
            check_tls_material(config)
        except AppLoadError as exc:
            print(f"ferryman: {args.config}: {exc}", file=sys.stderr)
            return 2
        try:
            build_proxy(config)
        except Exception as exc:  # noqa: BLE001 - report any failure of the user's app
            print(f"ferryman: {args.config}: app: {exc}", file=sys.stderr)
            return 2
        print(f"{args.config}: ok ({len(config.listeners)} listener(s), "
              f"{len(config.upstreams)} upstream group(s))")
        return 0
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        # (each process's own pid: the daemon's, a worker's, the main process's)
        format="ferryman[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.workers is not None and args.workers < 1:
        print("ferryman: --workers: expected an integer >= 1", file=sys.stderr)
        return 2
    from ferryman.server.process import ProcessSetupError, daemonize, redirect_output

    if args.daemon and config.server.error_log is None:
        print(
            f"ferryman: --daemon needs server.error_log in {args.config}: the file log "
            "lines go to once detached from the terminal",
            file=sys.stderr,
        )
        return 2
    if args.upgrade and config.server.upgrade_sock is None:
        print(
            f"ferryman: --upgrade needs server.upgrade_sock in {args.config}: the socket the "
            "running server hands its listening sockets over on",
            file=sys.stderr,
        )
        return 2
    from ferryman.server.upgrade import take_over

    try:
        server = build_server(config, workers=args.workers, config_path=args.config)
        server.install_signal_handlers()
        if args.upgrade:
            assert config.server.upgrade_sock is not None
            server.handover = take_over(config.server.upgrade_sock)
        else:
            # before binding: a server already running this config is to be upgraded,
            # and saying so beats "address already in use"
            server.open_upgrade_socket(replace=False)
        try:
            server.bind()
        except OSError:
            server.close_upgrade_socket()
            raise
        server.check_account()
    except AppLoadError as exc:
        print(f"ferryman: {args.config}: {exc}", file=sys.stderr)
        return 2
    except ProcessSetupError as exc:
        print(f"ferryman: {args.config}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"ferryman: cannot listen: {exc}", file=sys.stderr)
        return 1
    # the sockets are bound: errors that stop the start have been shown on the terminal
    if args.daemon:
        assert server.error_log is not None
        server.daemon = True
        # (an upgrade writes the pid file, and lets the launcher go, once it took over)
        server.ready_fd = daemonize(
            server.error_log, None if args.upgrade else server.pid_file, defer_ready=args.upgrade
        )
    elif server.error_log is not None:
        redirect_output(server.error_log, stdout_too=False)
    return server.run_forever()


if __name__ == "__main__":
    sys.exit(main())
