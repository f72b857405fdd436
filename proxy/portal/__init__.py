"""The self-service and help-desk portal: web pages served by the daemon.

Users sign in with their directory password (checked by the authentication
core as protocol ``portal``) and a TOTP code, and manage their own app
passwords; members of ``directory.admin_group`` also get the help desk. See
docs/portal.md. :mod:`proxy.portal.app` puts the pages together:
:mod:`~proxy.portal.signin`, :mod:`~proxy.portal.securityinfo` and
:mod:`~proxy.portal.helpdesk`, over :mod:`~proxy.portal.pages` (what every
page shares) and :mod:`~proxy.portal.site` (HTTP); app passwords are made in
:mod:`~proxy.portal.making`, :mod:`~proxy.portal.websessions` holds the page
sessions, :mod:`~proxy.portal.notify` the mail users get when an app password
is made for them or an authenticator set up, :mod:`~proxy.portal.words` what
the pages say.
"""
