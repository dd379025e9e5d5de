"""Jobs in the service: the Redis queue (`queue`), the workers that run the analysis core for its messages
(`worker`), the shared storage of slides, models and job folders (`storage`), and a private Redis-compatible
server for a standalone `pixelcam serve` (`redis_server`). The only package that talks to Redis or the storage."""
