"""The daemon's tree of services: started in order, stopped in reverse, each
stop finished before the next begins."""

from twisted.internet.defer import Deferred

from proxy.daemon.tree import Ordered, Part


def test_parts_stop_in_reverse_one_after_another():
    events = []
    store_closed: Deferred = Deferred()
    tree = Ordered()
    tree.startService()
    for name in ("pools", "store", "authentication", "listener"):
        stop = (lambda n=name: events.append(("stop", n)) or (store_closed if n == "store" else None))
        Part(name, start=lambda n=name: events.append(("start", n)), stop=stop).setServiceParent(tree)
    assert events == [("start", n) for n in ("pools", "store", "authentication", "listener")]
    events.clear()
    done = tree.stopService()
    assert events == [("stop", "listener"), ("stop", "authentication"), ("stop", "store")]
    assert not done.called  # the pools wait for the store to close
    store_closed.callback(None)
    assert events[-1] == ("stop", "pools") and done.called


def test_a_part_that_fails_to_stop_does_not_keep_the_others_running():
    stopped = []
    tree = Ordered()
    tree.startService()

    def broken():
        raise RuntimeError("cannot close")

    Part("first", stop=lambda: stopped.append("first")).setServiceParent(tree)
    Part("broken", stop=broken).setServiceParent(tree)
    done = tree.stopService()
    assert stopped == ["first"] and done.called
