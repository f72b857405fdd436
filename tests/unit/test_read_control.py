"""ReadControl: reading stops while answers pile up or a decision is pending."""

from twisted.internet.testing import StringTransport

from proxy.frontends.base import ReadControl


def test_either_reason_pauses_and_both_must_clear():
    transport = StringTransport()
    control = ReadControl(transport)
    transport.registerProducer(control, True)
    control.hold("decision")
    assert transport.producerState == "paused"
    control.pauseProducing()  # the write buffer is full as well
    control.resumeProducing()  # drained: but the decision still holds
    assert transport.producerState == "paused"
    control.release("decision")
    assert transport.producerState == "producing"


def test_a_stopped_control_does_nothing():
    transport = StringTransport()
    control = ReadControl(transport)
    control.stopProducing()
    control.hold("decision")
    assert transport.producerState == "producing"
