"""``tumorseg batch --ray ADDRESS``: the batch on a Ray cluster (:mod:`.ray_batch`), with the local
batch's layout, records, manifest, lock and resume rules (:mod:`tumorseg.batch`)."""
