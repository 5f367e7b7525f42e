"""The job dir: the durable truth about a job, on local disk or an object store.

``layout`` names every file; ``store`` is the narrow contract both media implement;
``records`` the sealed records and the segment format; ``writers`` how a worker stores
them; ``tables`` the columnar views; ``lease`` which driver owns the dir; ``ledger``
reads and writes it all.
"""
