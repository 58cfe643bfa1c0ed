"""The emulator's rules, with no socket, TLS or OpenSSL import: what DPS answers and why."""
