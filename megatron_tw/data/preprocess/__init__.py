"""Text -> megatron IndexedDataset preprocessing and the built-in corpus sources."""
