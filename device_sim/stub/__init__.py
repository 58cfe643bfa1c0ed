"""The local DPS emulator ("stub"): TLS front ends around a pure decision engine and a SQLite store."""
