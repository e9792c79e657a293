"""Model references, layouts and checks shared by every pillar (serve, train, evolve, memory)."""
