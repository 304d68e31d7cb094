"""marginsearch.losses: the unified margin-softmax head, its named points and auxiliary losses."""
