"""ssefs: a FUSE filesystem for S3 buckets encrypted with SSE-C (customer-provided keys)."""

__version__ = "0.1.0"
