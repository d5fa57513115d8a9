"""gradiag: gradient diagnostics as a service.

Installed, this folder is the one import name `gradiag` (pyproject.toml maps it with
setuptools' `package-dir`): `gradiag.engine` (NumPy autodiff), `gradiag.schemas` (the wire
models), `gradiag.service` (the Flask app, the CLI; the `server` extra) and `gradiag.client`
(the Python client, usable without the server's dependencies).
"""

__version__ = "0.1.0"
