"""Ready-made tasks with known answers: the digits job (:mod:`.digits`) and Gaussian mixtures with exact tilted
targets (:mod:`.gaussian_mixture`). Import the modules themselves (they load scikit-learn / data lazily)."""

__all__ = ["digits", "gaussian_mixture"]
