"""evolve: the monthly merge, distil, prune and quantize pipeline towards a smaller, faster base."""
