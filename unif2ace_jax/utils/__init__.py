"""Small shared utilities (image grids)."""
