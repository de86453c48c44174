"""Each paper's protocol on features already computed: the targets it builds from a dataset, the
model outputs it scores and the metric it reports.

Both layers above use it: ``engine/training`` for the validation metric that picks the best epoch,
``engine/evaluation`` for the tables of ``engine eval``. Neither of those imports the other.
"""
