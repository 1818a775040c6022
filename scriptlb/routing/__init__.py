"""Choosing the server and location of a request, and the URI helpers that routing needs."""
