"""Reading the corpus: one module per format behind one reader, storage, unit reads."""
