"""gRPC plumbing shared by both worker roles: the admin service and the server lifecycle."""
