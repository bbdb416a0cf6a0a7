"""The index of email addresses (projections seed).

A process application follows the users application and keeps one
``IndexItem`` aggregate per verified email address, whose id is derived from
the address: looking a user up by email is a single ``repository.get``.
"""
