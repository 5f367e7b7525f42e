"""The engine: a Ray-free scheduling policy (``scheduler``) and the transports it runs on
(``ray_transport`` for jobs, ``simulated`` for the simulation and the unit tests)."""
