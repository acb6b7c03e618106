"""Theory: statements, bound calculators, and the experiments that regenerate figures/."""
