"""legacy-auth-proxy: app passwords for legacy IMAP, SMTP and LDAP clients."""

__version__ = "0.1.0"
