"""`memorywall serve --api-servers N`: one engine process, N front processes (see `procs`)."""
