"""The command-line programs `device-sim` and `hsm-setup`: the only code that knows flag
names, prints for people and chooses exit codes (docs/architecture.md)."""
