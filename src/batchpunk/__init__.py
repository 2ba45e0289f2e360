"""batchpunk: fast, lossless asyncio batch processing."""
