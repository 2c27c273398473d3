"""dipsen as a Flower app: the same ``client_update`` and ``fedavg`` run on Flower's engines.

``client_app``/``server_app`` are the app (declared in pyproject.toml); ``task`` holds what they
share; ``launch`` starts SuperLinks/SuperNodes and runs the app on them (``simulate`` backs
``dipsen train --engine flower``).
"""
