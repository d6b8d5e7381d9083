"""File-level operations: load -> core -> save, one module per operation."""
