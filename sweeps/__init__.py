"""Built-in sweep specs, shipped as package data so `sweep run quickstart` works from any directory."""
