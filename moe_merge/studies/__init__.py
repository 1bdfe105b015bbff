"""Studies: experiments that train runs (annealing prediction, PMA-init, spike recovery) and
report on them."""
