"""The replication protocol as plain code: no sockets, no trio, no msgpack, no clock.

Everything that decides something lives here, so that the node and the
deterministic simulation in the tests run the very same protocol:

- ``decide``: votes (has a majority answered, can one still), which reply
  wins a read, which tag a write takes;
- ``acceptor``: what a replica does with an incoming store or prepare
  (the one refusal rule that lets blind writes and CAS share a register);
- ``atomic``: the functions of cas and incr on a register's value;
- ``operation``: one client operation as a state machine that is fed
  replies and answers with what to send next.

The trio side (``quorum.coordinator``, ``quorum.replica``,
``quorum.peer_service``, ``quorum.peers``) only moves these decisions'
messages and makes their effects durable. A test checks that importing this
package leaves trio and msgpack out of ``sys.modules``.
"""
