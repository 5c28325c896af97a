"""`make bench`: load tools that measure the proxy against a bare aiohttp baseline on loopback."""
