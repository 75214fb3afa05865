"""Python clients (sync and asyncio) and the `loraplex` command line."""
from clients.client import AsyncClient, Client

__all__ = ["Client", "AsyncClient"]
