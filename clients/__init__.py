"""Python clients (sync and asyncio) and the `loraplex` command line."""
from clients.client import AsyncClient, AsyncStream, Client, Stream, Tls

__all__ = ["Client", "AsyncClient", "Stream", "AsyncStream", "Tls"]
