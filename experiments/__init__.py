"""The paper's experiments as scripts (Tables II-IV, Fig. 3) and an offline proxy; see EXPERIMENTS.md."""
