"""The keylease demo: `make demo` (python -m demo)."""
