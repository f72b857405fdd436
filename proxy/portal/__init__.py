"""The self-service and help-desk portal: web pages served by the daemon.

Users sign in with their directory password (checked by the authentication
core as protocol ``portal``) and a TOTP code, and manage their own app
passwords; members of ``directory.admin_group`` also get the help desk. See
docs/portal.md. :mod:`proxy.portal.app` holds the pages,
:mod:`proxy.portal.websessions` the page sessions, :mod:`proxy.portal.notify`
the mail users get when an app password is made for them.
"""
