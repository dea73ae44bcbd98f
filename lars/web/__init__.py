"""The ``web`` role: the console (server-rendered pages) and the JSON API under ``/api/v1/``.

* :mod:`lars.web.auth` -- password and token hashes, signed session cookies, CSRF tokens,
  who may do what. No HTTP in it.
* :mod:`lars.web.service` -- every query and write the console offers, as plain async
  functions over a :class:`~lars.store.RouteStore`; pages and API are thin layers over it.
* :mod:`lars.web.app` -- the Starlette app: pages, API, auth and metrics middleware.
* :mod:`lars.web.role` -- the role: Hypercorn's trio worker serving the app.
* :mod:`lars.web.cli` -- ``lars web passwd`` and ``lars web token``.
"""
