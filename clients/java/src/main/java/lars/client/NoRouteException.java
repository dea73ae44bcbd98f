package lars.client;

/** The module has no route: it does not exist, or the agent has not received it yet. */
public class NoRouteException extends LarsException {
    private static final long serialVersionUID = 1L;

    /** An error with this message. */
    public NoRouteException(String message) {
        super(message);
    }
}
