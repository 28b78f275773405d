"""What a path holds and how it is read and written: safe loading, atomic outputs, locks, data sources, settings."""
