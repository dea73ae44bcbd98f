package lars.client;

/** A local mistake: a bad option, an IP address that is not dotted IPv4 text, an id outside 0..2^32-1. */
public class InvalidValueException extends LarsException {
    private static final long serialVersionUID = 1L;

    /** An error with this message. */
    public InvalidValueException(String message) {
        super(message);
    }
}
