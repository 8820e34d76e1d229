"""Names and shapes to plans: key rules (`keys`) and pairing source with target (`match`).

Pure functions over names and shapes: nothing here reads a file or a tensor.
"""
