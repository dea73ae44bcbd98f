package lars.client;

/** Every host of the module is overloaded; the agent gave no host this time. */
public class OverloadedException extends LarsException {
    private static final long serialVersionUID = 1L;

    /** An error with this message. */
    public OverloadedException(String message) {
        super(message);
    }
}
