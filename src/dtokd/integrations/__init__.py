"""Thin layers over :meth:`dtokd.Balancer.combine` for training frameworks that back-propagate
one loss themselves (each needs its framework installed: ``pip install 'dtokd[lightning]'``)."""
