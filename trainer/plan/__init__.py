"""`spot-trainer plan`: the memory model, the FLOP count, GPU and price tables, throughput, cost and rendering."""
