"""Optional per-response modules (issue 9): response compression first.

:mod:`ferryman.modules.compression` holds the sans-IO core of response compression:
Accept-Encoding negotiation, the rules for what to compress, header fix-ups, and
streaming gzip/brotli/zstd encoders and bounded decoders.
"""

from ferryman.modules.compression import (
    ALGORITHMS,
    BrotliEncoder,
    CompressionConfig,
    DecodeError,
    Decoder,
    DecompressionLimitError,
    Encoder,
    GzipEncoder,
    ZstdEncoder,
    add_vary_accept_encoding,
    apply_response_headers,
    negotiate,
    new_encoder,
    should_compress,
)

__all__ = [
    "ALGORITHMS",
    "BrotliEncoder",
    "CompressionConfig",
    "DecodeError",
    "Decoder",
    "DecompressionLimitError",
    "Encoder",
    "GzipEncoder",
    "ZstdEncoder",
    "add_vary_accept_encoding",
    "apply_response_headers",
    "negotiate",
    "new_encoder",
    "should_compress",
]
