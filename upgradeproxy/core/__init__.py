"""The request path: from a client's bytes to a backend and back, and the tunnel after a switch.

Read it in the order a request takes: :mod:`.factory` (the listening door)
and :mod:`upgradeproxy.web` (the twisted.web door) hand each request to an
``Exchange`` (``_exchange``) of the :class:`~.proxy.Proxy`; ``_client`` is the
HTTP/1.1 wire, ``_backend`` the connection to the backend, ``_tunnel`` and
``_splice`` the raw pass-through after ``101``. :mod:`.routing`,
:mod:`.balancer` and :mod:`.address` say where a request goes; :mod:`.accesslog`
records it. Nothing here imports the command line (:mod:`upgradeproxy.cli`)
or the operations layer (:mod:`upgradeproxy.ops`).
"""
