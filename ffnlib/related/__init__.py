"""Related papers revisited in the key-value view: one module per paper."""
