"""Other systems' code, loaded unchanged, to measure next to ours in the same run."""
