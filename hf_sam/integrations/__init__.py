"""SAM trainers for libraries built on the Trainer (imported lazily: they stay optional)."""
