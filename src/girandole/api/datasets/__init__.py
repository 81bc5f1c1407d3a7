"""Fireworks' datasets API (`/v1/accounts/{a}/datasets`): the files batch jobs read and write
(route.py); stored by girandole.batch.store."""
