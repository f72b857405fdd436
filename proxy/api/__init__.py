"""The REST API: JSON over HTTPS on the portal's listener, under ``/api/v1/``.

Scripts of the help desk and of device fleets list, make and delete app
passwords and act on users' state, under the same rules and audit as the
command line and the help desk pages (:class:`proxy.admin.Admin`), with
``actor: api:NAME``. Callers present an API token made with
``legacy-auth-proxy api-token create`` (kept as a keyed hash only), each
with a scope and a rate. :mod:`~proxy.api.app` holds the operations (a Klein
app the portal mounts), :mod:`~proxy.api.problems` the errors as RFC 9457
problem details, :mod:`~proxy.api.limits` the rate per token,
:mod:`~proxy.api.views` the JSON of records, pages and ETags;
``openapi.yaml`` describes it all, and is what the tests hold it to.
See docs/api.md.
"""
