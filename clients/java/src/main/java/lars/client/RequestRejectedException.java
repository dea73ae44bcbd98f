package lars.client;

/**
 * The agent answered with an error (an invalid request, an internal error) or with a reply of the
 * wrong kind. {@link #code()} is the agent's return code ({@link RetCode#SYSTEM_ERROR} if it gave
 * none).
 */
public class RequestRejectedException extends LarsException {
    private static final long serialVersionUID = 1L;
    private final int code;

    /** An error with this message and return code. */
    public RequestRejectedException(String message, int code) {
        super(message);
        this.code = code;
    }

    /** The agent's return code. */
    public int code() {
        return code;
    }
}
