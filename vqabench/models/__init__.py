"""Model families behind one seam: the engine talks to models only through :mod:`vqabench.models.family`."""
